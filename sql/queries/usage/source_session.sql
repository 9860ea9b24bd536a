-- Read the core service's timestamps in an unambiguous text form for COPY.
SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'
