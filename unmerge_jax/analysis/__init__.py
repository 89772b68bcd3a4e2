"""Task-vector sparsity: streaming metrics, the RL task-vector simulator, the scaling-law fit, and
the studies that regenerate the tables and figures of "Does Sparsity Persist? Scaling Laws for
RL-Induced Task Vectors and Reinforced Agent Merging at 70B+ Scale" (called *the sparsity-scaling
paper* in this package)."""
