"""`python -m kdcache ...` is the `kdcache` command."""

from kdcache.pipeline.cli import main

if __name__ == "__main__":
    main(prog_name="kdcache")
