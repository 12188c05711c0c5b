"""The functional core: tasks, live observations, the planner, change control's
decisions, the forgetting guard, sync windows and the error vocabulary. Pure:
no I/O and no clock (every time is an argument)."""
