"""The runtime: processes (llama.cpp servers, the gateway, ...) started, watched and stopped."""
