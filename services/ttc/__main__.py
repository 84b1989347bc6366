"""``python -m services.ttc --db PATH``: serve Transactional Tool Calls until SIGINT / SIGTERM."""

from services.base import main
from services.ttc.service import TtcService

if __name__ == "__main__":
    raise SystemExit(main(TtcService()))
