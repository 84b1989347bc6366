"""``python -m services.rois``: serve until SIGINT / SIGTERM."""

from services.base import main
from services.rois.service import SERVICE

if __name__ == "__main__":
    raise SystemExit(main(SERVICE))
