#!/usr/bin/perl
# Turns a CUDA source into C++ for the CPU emulator (tests/cudasim): the two constructs g++ cannot
# parse become calls into the emulator. Line numbers are kept (one line in, one line out), and a
# #line directive names the original file, so diagnostics point at the real source.
#   kernel<<<grid, block[, smem[, stream]]>>>(args)  ->  blip2_sim::config(grid, block, ...).launch(kernel, "kernel", args)
#   extern __shared__ [__align__(N)] T name[];       ->  T *name = (T *)blip2_sim::dynamic_smem();
#   __launch_bounds__(MAX[, MIN]) ... {               ->  the same, then blip2_sim::block_bounds(MAX); after the
#                                                         body's brace (a block of more threads fails, as on a GPU)
use strict;
use warnings;
my ($in, $out) = @ARGV;
open(my $fh, '<', $in) or die "rewrite.pl: $in: $!\n";
my @lines = <$fh>;
close $fh;
my $text = "#line 1 \"$in\"\n";
my $bounds; # a kernel's __launch_bounds__ maximum, until its body's opening brace
for my $l (@lines) {
    if ($l =~ /__launch_bounds__\(/) {
        my $rest = substr($l, $+[0]);
        my ($depth, $arg) = (0, '');
        for my $ch (split //, $rest) {
            last if $depth == 0 && ($ch eq ',' || $ch eq ')');
            $depth++ if $ch eq '(';
            $depth-- if $ch eq ')';
            $arg .= $ch;
        }
        $bounds = $arg;
    }
    if (defined $bounds && $l =~ /\{/) {
        $l =~ s/\{/{ blip2_sim::block_bounds($bounds);/;
        undef $bounds;
    }
    $l =~ s/\b(\w+(?:<[^<>;()]*>)?)<<<(.*?)>>>\(/blip2_sim::config($2).launch($1, "$1", /g;
    $l =~ s/\bextern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;/$1 *$2 = ($1 *)blip2_sim::dynamic_smem();/g;
    die "rewrite.pl: $in: a launch the rewrite does not understand: $l" if $l =~ /<<<|>>>/;
    $text .= $l;
}
open(my $oh, '>', $out) or die "rewrite.pl: $out: $!\n";
print $oh $text;
close $oh;
