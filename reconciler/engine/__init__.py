"""Reconciling: one task's call (``reconcile``), a rollout (``apply``), change
control's state (``admission``), the work queue, the observer, metrics and
the daemon that ties them together."""
