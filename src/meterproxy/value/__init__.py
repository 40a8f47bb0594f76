"""Value, not volume: tasks (calls grouped by x-meterproxy-task), the outcomes clients report
for them, repeated prompts, and the figures per successful task built from all three."""
