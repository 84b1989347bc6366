"""``python -m services.cpcs``: serve the critical-path compute scheduler."""

from services.base import main
from services.cpcs.service import CpcsService

if __name__ == "__main__":
    raise SystemExit(main(CpcsService()))
