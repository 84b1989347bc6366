"""reca's services: one process per runtime primitive, each speaking to the kernel only.

services/base.py is the runtime every service uses; each other module or package is one service
with a ``python -m services.<name>`` entry point.  Services import ``kernel`` (its public
protocol, codec and errors) and ``clients``, never each other.
"""
