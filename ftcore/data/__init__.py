"""The data path: records read from files (``records``) -> validated and rendered by the format plugin
-> tokenized with exact labels (``labels``) -> split and counted (``pipeline``), cached (``cache``),
batched (``batching``), shown with supervised tokens marked (``show``)."""
