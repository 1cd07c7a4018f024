-- ARGV: now (ms), at most how many holds to release. Releases holds past their expiry.
return purge(ARGV[1], ARGV[2])
