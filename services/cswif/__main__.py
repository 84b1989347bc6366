"""``python -m services.cswif``: serve the what-if gate until SIGINT / SIGTERM."""

from services.base import main
from services.cswif.service import CSWIFService

if __name__ == "__main__":
    raise SystemExit(main(CSWIFService()))
