"""Communicators and sharding plans: how one model is split across ranks (TP heads, EP experts)."""
