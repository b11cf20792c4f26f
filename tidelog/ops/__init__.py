"""Operator tools built on the library: the ``tidelog`` command, the local cluster, the chaos
tester and the benchmarks.

``tidelog.node``, ``tidelog.controller`` and ``tidelog.client`` never import this package
(tests/unit/test_import_graph.py checks it): a node or an application using the client does
not load click, rich or the tools' code.
"""
