"""Structured events: structlog configured in one place, and its console
renderer. Every layer logs through it; it imports none of them."""
