"""The vipd benchmark: vipd, the baseline and peer relays side by side in front of the same sinks.

``python -m bench compare`` runs the comparison, ``python -m bench micro`` times the protocol core,
``python -m bench idle`` measures vipd's memory per idle session; see ``bench/README.md``. One job per
module:

- ``system``      the contract every system under test follows (``System``, ``Endpoint``, ``Unavailable``)
- ``systems``     the baseline and vipd systems, plus the peers of ``bench.peers`` when present
- ``peers``       the peer relays (HAProxy, nginx, Haraka, Postfix, sendmail, aiosmtpd), written apart
- ``postfix``     Postfix's ``smtp-source`` and ``smtp-sink`` unpacked from the Debian package
- ``process``     starting and stopping daemons by PID, finding the port a process listens on
- ``proctree``    CPU and memory of process trees from ``/proc``
- ``sinks``       the two ``smtp-sink`` processes and their message counters
- ``loads``       the loads and one ``smtp-source`` run
- ``measure``     one measurement of one system under one load
- ``compare``     the interleaved comparison run
- ``stats``       medians, ratios and added latency from the samples
- ``report``      the Markdown table and the JSON file
- ``plots``       the PNG bar charts
- ``micro``       the micro-benchmark of ``vipd.smtp.server.ServerConnection``
- ``idle``        vipd's memory per idle session (VmRSS before and after opening 1,000 of them)
"""
