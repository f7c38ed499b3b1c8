"""``python -m distac`` (and ``accelerate launch -m distac ...``): the command-line tool."""

from distac.cli import main

if __name__ == "__main__":
    main()
