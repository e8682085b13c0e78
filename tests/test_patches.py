"""The fixes to BentoML and uvicorn (services/runtime/patches/) reach into their internals: the
versions they were written for are the installed ones, and what each fix relies on is still there,
so an upgrade fails here, loudly, and not silently in production."""

import importlib.metadata

import requests

from services.runtime import patches


def test_the_installed_framework_is_the_one_the_fixes_were_written_for():
    running = {package: importlib.metadata.version(package) for package in patches.WRITTEN_FOR}
    assert running == patches.WRITTEN_FOR, ("BentoML or uvicorn changed: re-check every fix in "
                                            "services/runtime/patches/ and then update WRITTEN_FOR")
    assert patches.status()["matches"] is True and "warning" not in patches.status()


def test_what_each_fix_relies_on_is_still_there():
    """(What each fix changes is measured by tests/test_pauses.py and tests/test_hot_path.py.)"""
    import inspect

    from _bentoml_impl.server.app import ServiceAppFactory
    from _bentoml_sdk.method import APIMethod
    from bentoml._internal.server.http import traffic
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # pauses.install_timeout_fix rewrites the timeout middleware's __call__ around its own timer callback
    assert callable(getattr(traffic.TimeoutMiddleware, "_set_timer_out", None))
    # hot_path: the middleware stack is a property; the API method a descriptor
    assert isinstance(inspect.getattr_static(ServiceAppFactory, "middlewares"), property)
    assert hasattr(APIMethod, "__get__")
    # connections: the h11 protocol's three hooks the header timer wraps
    for hook in ("connection_made", "handle_events", "on_response_complete"):
        assert callable(getattr(H11Protocol, hook)), hook


def test_info_says_which_versions_the_fixes_were_written_for(policy_server):
    fixes = requests.get(f"{policy_server.url}/info", timeout=10).json()["framework_fixes"]
    assert fixes["written_for"] == patches.WRITTEN_FOR and fixes["matches"] is True
