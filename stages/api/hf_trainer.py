"""`kdcache.KDTrainer`: Hugging Face's `Trainer` with `kd_loss` as its loss (issue 23).

Imported only when `kdcache.KDTrainer` is first named (transformers is the optional `lm` extra).
Everything else is the stock Trainer: `TrainingArguments`' optimiser, schedule, precision,
gradient accumulation, data parallel, checkpoints and resume. The loss is a per-batch mean, as in
`kdcache train`, so `loss_is_scaled_for_ga = False` lets the Trainer divide it by the
accumulation steps. The KD and CE terms are logged beside `loss` as `kd_loss` and `ce_loss`.
"""

from __future__ import annotations

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from kdcache.stages.api.cache import Collate
from kdcache.stages.api.kd_loss import ALPHA, kd_loss
from kdcache.storage.errors import UsageError

# The batch entries that are the loss's, not the model's.
_OWN = ("labels", "target_mask", "positions", "kd")


class KDTrainer(Trainer):
    loss_is_scaled_for_ga = False  # kd_loss is a per-batch mean

    def __init__(self, *args, alpha: float = ALPHA, temperature: float | None = None,
                 chunk_mb: float = 64.0, **kwargs):  # fmt: skip
        data = kwargs.get("train_dataset")
        if kwargs.get("data_collator") is None:
            info = getattr(data, "info", None) or getattr(kwargs.get("eval_dataset"), "info", None)
            if info is None:
                raise TypeError(
                    "KDTrainer: pass train_dataset=cache.dataset(data) (or data_collator="
                    "cache.collate): its batches must carry the cache's soft targets"
                )
            kwargs["data_collator"] = Collate(info)
        super().__init__(*args, **kwargs)
        info = getattr(self.data_collator, "info", None)
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        width = getattr(head, "out_features", None)
        if info is not None and width is not None and width != info.num_classes:
            # Checked here, before any step: kd_loss would refuse the first batch anyway.
            raise UsageError(
                f"KDTrainer: the model outputs {width} logits per token but the cache's "
                f"vocabulary is {info.num_classes}: build it with vocab_size={info.num_classes}"
            )
        self.alpha, self.temperature, self.chunk_mb = alpha, temperature, chunk_mb
        self._terms: torch.Tensor | None = None  # summed (kd, ce) since the last log, on device
        self._steps = 0

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        # The stock wrapper drops item keys the model's forward does not name: the stored
        # columns among them. Our collator passes the model only what it takes.
        if isinstance(data_collator, Collate):
            return data_collator
        return super()._get_collator_with_removed_columns(data_collator, description)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`kd_loss` of the model's logits on the batch (num_items_in_batch is not used: the
        loss is a mean per batch, see `loss_is_scaled_for_ga`)."""
        info = inputs["kd"]
        stored = {f.name for f in info.codec.token_fields()}
        x = {k: v for k, v in inputs.items() if k not in stored and k not in _OWN}
        outputs = model(**x)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        terms = kd_loss(logits, inputs, self.alpha, self.temperature, self.chunk_mb, True)
        if model.training:
            # Weighted as the Trainer weights `loss` (1 / the step's accumulation count, which
            # is smaller at an epoch's last step), so the logged terms mix into the logged loss.
            ga = getattr(self, "current_gradient_accumulation_steps", None)
            w = 1.0 / (ga or self.args.gradient_accumulation_steps)
            step = torch.stack([terms.kd, terms.ce]).detach().float() * w
            self._terms = step if self._terms is None else self._terms + step
            self._steps += w
        return (terms.loss, outputs) if return_outputs else terms.loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._terms is not None:
            # The one read-back of the terms per log, as the Trainer's own for `loss`.
            mean = nested_gather(self._terms / self._steps, self.args.parallel_mode)
            kd, ce = mean.reshape(-1, 2).mean(0).tolist()
            logs["kd_loss"], logs["ce_loss"] = kd, ce
            self._terms, self._steps = None, 0
        super().log(logs, start_time)
