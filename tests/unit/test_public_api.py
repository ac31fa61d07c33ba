from __future__ import annotations

import etcd_patterns


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(etcd_patterns) if not name.startswith("_")}
    public.discard("testing")  # a submodule, imported only when asked for
    assert set(etcd_patterns.__all__) - {"__version__"} == public


def test_every_error_derives_from_the_base() -> None:
    for name in etcd_patterns.__all__:
        obj = getattr(etcd_patterns, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, etcd_patterns.EtcdPatternsError), name


def test_timeouts_are_timeout_errors() -> None:
    assert issubclass(etcd_patterns.ConflictError, TimeoutError)
