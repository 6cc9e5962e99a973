"""Built-in plugins. Each module is registered like a third-party plugin, in this order."""

BUILTIN_PLUGINS = (
    "plugins.project_keys",
    "plugins.key_injection",
    "plugins.stream_usage",
    "plugins.usage_openai",
    "plugins.usage_anthropic",
    "plugins.stream_errors",
    "plugins.pricing",
    "plugins.body_capture",
    "plugins.metrics",
    # pluggy calls the last registered first: the cache decides before the budgets, and both before
    # the rate limits, so that a cache hit or a budget rejection consumes no rate-limit quota.
    "plugins.rate_limits",
    "plugins.budgets",
    "plugins.cache",
    "plugins.translation",
)
