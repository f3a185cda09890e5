"""Run the hybridize CLI from a checkout: `python cli.py convert llama -o out/x`. The app is hybridize/cli.py."""

from hybridize.cli import main

if __name__ == "__main__":
    main()
