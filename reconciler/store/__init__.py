"""State stores: the store's model (``base``), SQLite and PostgreSQL backends,
the single writer (:class:`~reconciler.store.recorder.Recorder`), the
one-writer lock and leader election. ``base`` imports no backend;
:func:`open_store` here picks one by location."""

from __future__ import annotations

from typing import Any

from reconciler.store.base import BACKENDS, Backend, PostgresURL


def _open_sqlite(*args: Any, **kwargs: Any) -> tuple[Backend, int]:
    from reconciler.store.sqlite import open_sqlite

    return open_sqlite(*args, **kwargs)


def _open_postgres(*args: Any, **kwargs: Any) -> tuple[Backend, int]:
    from reconciler.store.postgres import open_postgres

    return open_postgres(*args, **kwargs)


def _postgres_exists(url: PostgresURL) -> bool:
    from reconciler.store.postgres import store_exists

    return store_exists(url)


# Imported lazily: the PostgreSQL driver loads only for a PostgreSQL store.
BACKENDS.open_sqlite = _open_sqlite
BACKENDS.open_postgres = _open_postgres
BACKENDS.postgres_exists = _postgres_exists
