"""Views: how plans, problems, statuses and progress are printed."""
