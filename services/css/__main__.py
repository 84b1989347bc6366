"""``python -m services.css``: serve the constraint-slack scheduler."""

from services.base import main
from services.css.service import CssService

if __name__ == "__main__":
    raise SystemExit(main(CssService()))
