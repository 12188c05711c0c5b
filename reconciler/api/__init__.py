"""The remote API: the signed HTTP client, its credentials, QPS budget and
adaptive in-flight limit."""
