"""The nemesis: seeded fault schedules, recorded histories, and the checkers that judge them.

A campaign (`tests.nemesis.campaign`) starts a proxied 3-node cluster, runs
client processes that record every operation (`history`), while the
nemesis (`schedule`) injects faults drawn from a seed; then a checker
(`checkers`) decides whether the history is legal.
"""
