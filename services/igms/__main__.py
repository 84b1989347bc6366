"""``python -m services.igms``: serve the IGMS controller until SIGINT / SIGTERM."""

from services.base import main
from services.igms.service import IGMSService

if __name__ == "__main__":
    raise SystemExit(main(IGMSService()))
