"""job logs: the worker's log lines per job, for GET /jobs/{id}/logs and the events stream

Revision ID: 0003_job_logs
Revises: 0002
Create Date: 2026-11-23 23:40:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_job_logs"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("level", sa.String(length=10), nullable=False),
        sa.Column("logger", sa.String(length=200), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["training_job.id"], name=op.f("fk_job_log_job_id_training_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_log")),
    )
    with op.batch_alter_table("job_log", schema=None) as batch_op:
        batch_op.create_index("ix_job_log_job_id_id", ["job_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_log", schema=None) as batch_op:
        batch_op.drop_index("ix_job_log_job_id_id")
    op.drop_table("job_log")
