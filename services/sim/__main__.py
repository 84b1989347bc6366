"""``python -m services.sim``: serve the simulation worker until SIGINT / SIGTERM."""

from services.base import main
from services.sim.service import SimService

if __name__ == "__main__":
    raise SystemExit(main(SimService()))
