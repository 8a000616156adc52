"""Entry point of the chat app."""
import sys


def main() -> int:
    print("The chat UI is not there yet; see README.md for what works today.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
