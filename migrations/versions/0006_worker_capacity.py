"""worker_capacity: what each worker can serve (the API refuses at submit a job none could run)

Revision ID: 0006_worker_capacity
Revises: 0005_gang
Create Date: 2026-12-20 12:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_worker_capacity"
down_revision: str | Sequence[str] | None = "0005_gang"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_capacity",
        sa.Column("worker_id", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("accelerator", sa.String(length=16), nullable=False),
        sa.Column("max_devices", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_worker_capacity")),
    )
    with op.batch_alter_table("worker_capacity", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_worker_capacity_heartbeat_at"), ["heartbeat_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("worker_capacity", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worker_capacity_heartbeat_at"))
    op.drop_table("worker_capacity")
