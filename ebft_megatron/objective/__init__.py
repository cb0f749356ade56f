"""EBFT's objective: rewards and RLOO advantages from feature Gram matrices, verifiable rewards
(RLVR), and the policy losses (REINFORCE + gamma * CE, or plain CE for SFT)."""
