"""The ``tabular`` task: a model of one column of each site's own CSV or Parquet files, no code needed.

``fedfleet worker --data FILE --task tabular --task-option label=COLUMN``: each site trains on its own
files, read in record batches (a file larger than memory trains too). Before the first round the sites
describe their data (counts, sums, category values: never rows) and the coordinator agrees a plan from
the descriptions: the classes, each category column's vocabulary, each number column's mean and scale,
i.e. what a central pipeline would compute from all the rows. The modules, in the order data goes:

- ``settings``: the task options (``OPTIONS``) and their parsing.
- ``read``: finding and scanning the files, reading them in chunks, the validation split.
- ``describe``: a site's description, checking one, and the plan from all of them (pydantic models).
- ``encode``: rows to model inputs and targets, as the plan says.
- ``models``: logistic/linear regression in numpy, an MLP in PyTorch, and their local SGD.
- ``metrics``: scores summed over chunks.
- ``split``: one file cut into per-site files (``fedfleet run --data-split``).
- ``task``: ``TabularTask``, the task fedfleet loads.
"""

from fedfleet.tasks.tabular.task import TabularTask

# Its public home, where BUILTIN names it ("fedfleet.tasks.tabular:TabularTask") and tests check a
# built-in task's class is found.
TabularTask.__module__ = __name__

__all__ = ["TabularTask"]
