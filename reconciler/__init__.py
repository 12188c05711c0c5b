"""Declarative reconciler for Volcengine RTC audio-segment tasks."""

__version__ = "0.1.0"
