from __future__ import annotations

import types

import etcd_patterns


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(etcd_patterns).items()
        # Public submodules (testing, cli, pytest_plugin) appear once imported.
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(etcd_patterns.__all__) - {"__version__"} == public


def test_every_error_derives_from_the_base() -> None:
    for name in etcd_patterns.__all__:
        obj = getattr(etcd_patterns, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, etcd_patterns.EtcdPatternsError), name


def test_timeouts_are_timeout_errors() -> None:
    assert issubclass(etcd_patterns.ConflictError, TimeoutError)
