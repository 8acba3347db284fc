"""gang scheduling: training_job.nodes and the job_slot table of multi-node jobs

Revision ID: 0005_gang
Revises: 0004_weights
Create Date: 2026-11-23 23:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_gang"
down_revision: str | Sequence[str] | None = "0004_weights"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nodes", sa.Integer(), nullable=False, server_default=sa.text("1")))
    op.create_table(
        "job_slot",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("endpoint", sa.String(length=300), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["training_job.id"], name=op.f("fk_job_slot_job_id_training_job"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "slot", name=op.f("pk_job_slot")),
        sa.UniqueConstraint("job_id", "worker_id", name=op.f("uq_job_slot_job_id_worker_id")),
    )


def downgrade() -> None:
    op.drop_table("job_slot")
    with op.batch_alter_table("training_job", schema=None) as batch_op:
        batch_op.drop_column("nodes")
