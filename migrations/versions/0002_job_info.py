"""job info: what the worker resolved from the spec (input, device, precision, init report)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 21:10:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("info", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table("training_job", schema=None) as batch_op:
        batch_op.drop_column("info")
