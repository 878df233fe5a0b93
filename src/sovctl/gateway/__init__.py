"""The gateway: one OpenAI-compatible base URL in front of every local runtime.

Requests are routed by their `model` through one table (routes.json); each runtime has a
bounded queue so that no request is dropped silently: it completes, or gets 429/503.
"""
