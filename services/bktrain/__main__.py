"""``python -m services.bktrain``: serve ResNet-BK training until SIGINT / SIGTERM."""

from services.base import main
from services.bktrain.service import BKTrainService

if __name__ == "__main__":
    raise SystemExit(main(BKTrainService()))
