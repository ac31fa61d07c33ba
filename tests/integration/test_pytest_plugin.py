"""The pytest plugin users get: fixtures in a project with no conftest of its own."""

from __future__ import annotations

import pytest


@pytest.mark.timeout(90)
def test_a_users_suite_gets_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user_code="""
        from etcd_patterns import EtcdPatterns

        def test_transform(etcd_patterns):
            assert isinstance(etcd_patterns, EtcdPatterns)
            assert etcd_patterns.transform("n", lambda v: str(int(v) + 1), default="0") == "1"

        def test_fresh_namespace_per_test(etcd_patterns):
            assert etcd_patterns.get_values("n") == []

        def test_the_server(etcd_server):
            assert etcd_server.endpoints
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
