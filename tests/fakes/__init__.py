"""Fakes shared by several test modules: reactors, transports, exchanges, upstreams."""
