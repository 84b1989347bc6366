"""``python -m services.sparkvm``: serve the opcode VM until SIGINT / SIGTERM."""

from services.base import main
from services.sparkvm.service import SparkVM

if __name__ == "__main__":
    raise SystemExit(main(SparkVM()))
