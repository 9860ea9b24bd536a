"""The SQL files (migrations, named queries, schema.sql), installed as the package ``billing_sql``."""
