"""``view``: a live page of the runtime in the browser (docs/view.md).

The service polls the kernel (``mmi.stats``), listens to the control bus (every preempt, resume
and cancel as it is published) and serves one page over HTTP (aiohttp) with the state streamed
as server-sent events: jobs and their budgets burning down, requests queued and in flight per
service, service processes with their restarts and exit reasons, and preemptions, refusals and
restarts as they happen.  The page needs the access token the service writes to
``{runtime}/view.url`` (mode 0600, readable only by the kernel's user, like the kernel's socket);
``python -m clients view`` prints that URL.
"""
