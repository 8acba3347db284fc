"""weights_file: starting weights uploaded with POST /weights (safetensors bytes + metadata)

Revision ID: 0004_weights
Revises: 0003_job_logs
Create Date: 2026-11-23 23:40:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_weights"
down_revision: str | Sequence[str] | None = "0003_job_logs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "weights_file",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(length=500), nullable=False),
        sa.Column("source_format", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("num_tensors", sa.Integer(), nullable=False),
        sa.Column("num_parameters", sa.BigInteger(), nullable=False),
        sa.Column("architecture", sa.String(length=64), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_weights_file")),
    )
    with op.batch_alter_table("weights_file", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_weights_file_sha256"), ["sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("weights_file", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_weights_file_sha256"))
    op.drop_table("weights_file")
