"""tollhouse: an LLM API gateway built as a mitmproxy addon.

Plugins import the hook marker from here::

    from addons import hookimpl
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("tollhouse")
