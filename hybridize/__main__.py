"""`python -m hybridize ...`, the same as the `hybridize` command; it lets `accelerate launch -m hybridize distill ...`
start one copy per process."""

from hybridize.cli import main

if __name__ == "__main__":
    main()
