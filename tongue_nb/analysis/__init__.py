"""Analysis: metrics, report tables, figures, error analysis and explanations, the data review."""
