"""What the daemon serves and sends: status reports, the dashboard, health and
metrics endpoints, webhook notices, the recent-events ring."""
