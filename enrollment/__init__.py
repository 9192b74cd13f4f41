"""cryid.enrollment: the infant registry (SQLite) and the enrollment commands."""
