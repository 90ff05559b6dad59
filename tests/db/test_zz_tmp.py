from sqlalchemy import text
from tests.cost_rows import make_costed_run
def test_x(db_session):
    make_costed_run(db_session)
    print(db_session.execute(text("select id, skipped_seeds, jsonb_typeof(skipped_seeds) from jobs")).all())
